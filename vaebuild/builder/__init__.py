"""Building engine folders: profile specs (`specs`, YAML in `profiles/`), the build plan and loop with its manifest
entries (`engines`), and one build as the CLI runs it (`run`)."""
