"""The command-line tools (the top layer): mirage-train, mirage-export, mirage-run, mirage-serve."""
