import sys

from dreambooth.cli import main

sys.exit(main())
