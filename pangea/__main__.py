import sys

from pangea.cli import main

sys.exit(main())
