import sys

from EOIRRegistrationLib.cli.main import main

sys.exit(main())
