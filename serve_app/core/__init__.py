"""The shared core every feature builds on: config, errors and their HTTP mapping, auth, URL safety, state, types."""
