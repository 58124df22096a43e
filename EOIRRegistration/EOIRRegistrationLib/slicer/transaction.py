"""One scene transaction: the nodes a registration adds and the changes it makes, undone together
when it fails or is cancelled, so the scene is left as it was."""
from __future__ import annotations

from EOIRRegistrationLib.slicer import bridge


class SceneTransaction:
    """Nodes added and changes made while creating outputs, undone together on failure.

    Every node added to the scene after the transaction started (new outputs, colour tables,
    display nodes created for existing nodes) is removed on rollback; changes to existing nodes
    are undone from the records made before changing them.
    """

    def __init__(self, scene):
        self.scene = scene
        self.created = []
        self.undo = bridge.UndoStack()
        self._nodeIDsBefore = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}

    def added(self, node):
        if node is not None:
            self.created.append(node)
        return node

    def backupContent(self, node):
        """Remember ``node``'s content (transform, voxels, geometry) to restore it on failure."""
        backup = self.scene.CreateNodeByClass(node.GetClassName())
        backup.CopyContent(node, True)
        self.undo.add(node.CopyContent, backup, True)
        name = node.GetName()
        self.undo.add(node.SetName, name)

    def backupReferences(self, node, roles):
        for role in roles:
            self.undo.add(node.SetNodeReferenceID, role, node.GetNodeReferenceID(role))

    def backupAttributes(self, node, names):
        for name in names:
            previous = node.GetAttribute(name)
            if previous is None:
                self.undo.add(node.RemoveAttribute, name)
            else:
                self.undo.add(node.SetAttribute, name, previous)

    def rollback(self):
        try:
            self.undo.run()
        finally:
            added = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())
                     if self.scene.GetNthNode(i).GetID() not in self._nodeIDsBefore]
            bridge.removeNodes(self.scene, list(reversed(self.created)) + added[::-1])
            self.created = []
