"""`python -m loraswitch.server [OPTIONS]`: the same as `loraswitch serve`."""

from loraswitch.server.cli import main

main()
