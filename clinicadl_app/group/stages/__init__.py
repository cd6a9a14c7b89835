"""One module per group-level stage; each reads what earlier stages wrote to disk, never their code."""
