"""``python -m slaconv`` (and ``accelerate launch -m slaconv``) runs the CLI."""

from .cli import main

main()
