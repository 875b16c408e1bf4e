#!/bin/sh
# Doxygen's input filter for the Markdown pages (FILTER_PATTERNS in Doxyfile.in): the chapters link figures as
# ../docs/figures/NAME.png, right on GitHub and in an editor; Doxygen finds an image only by a path that ends
# the real one, so the "../" goes.
exec sed -e 's|](\.\./docs/figures/|](docs/figures/|g' "$1"
