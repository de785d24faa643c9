"""datatrove pipelines for corpus builds: the steps, and the assembly that runs them."""
