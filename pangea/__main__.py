import sys

from pangea.app.cli import main

sys.exit(main())
