"""``python -m example_modules fit --config ...``: see :mod:`example_modules.cli`."""

from example_modules.cli import main

if __name__ == "__main__":
    main()
