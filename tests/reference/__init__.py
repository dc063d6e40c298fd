"""Reference implementations vendored from other projects (licenses in each file), for tests only."""
