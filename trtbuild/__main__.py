"""`python -m trtbuild`: the command line."""

from trtbuild.cli import main

main()
