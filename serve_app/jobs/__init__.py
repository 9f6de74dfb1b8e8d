"""The async queue: job records and their state machine (store), workers that run them, the HTTP layer's backend."""
