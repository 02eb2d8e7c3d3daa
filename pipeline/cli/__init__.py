"""The top floor: click command lines and the step runner of `make demo`. May import every stage."""
