"""The only code that knows all-in-one vs one service per process, memory vs Redis, SQLite vs
PostgreSQL."""
