"""Studies: thin, resumable compositions of the core library. The core never imports them."""
