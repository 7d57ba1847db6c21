"""The console script's commands, one module per group; :mod:`mmneurons_utils.cli` parses
the command line and calls them."""
