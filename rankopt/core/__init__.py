"""Records and errors: the bottom layer, importing nothing else of rankopt."""
