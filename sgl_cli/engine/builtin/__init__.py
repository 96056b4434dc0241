"""The built-in pair (trained, shipped) and random pairs built offline, and the shapes task they answer."""
