"""Drop-in surfaces for code written against other CLAP libraries (``compat.laion``)."""
