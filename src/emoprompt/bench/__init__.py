"""The conformance matrix: the engine against the plain reference on tiny models of
every architecture the capability table covers."""
