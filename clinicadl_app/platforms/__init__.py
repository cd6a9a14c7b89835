"""How platforms run the app: a Boutiques descriptor (CBRAIN and any Boutiques runner) and a brainlife.io
entry point, both derived from the command line itself so they cannot drift from it."""
