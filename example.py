"""The original ExampleGPT entry point: `python example.py train`, `python example.py generate --prompt ...`."""

import sys

from examplegpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
