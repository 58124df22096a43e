import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "EOIRRegistration")))

import torch  # noqa: E402

# Tests use tiny volumes, where one thread is fastest and immune to CPU oversubscription.
torch.set_num_threads(1)
