"""``python -m clipvip <command>`` (or ``clipvip <command>``): the one entry point of every app."""
from clipvip.apps.main import entry

if __name__ == "__main__":
    entry()
