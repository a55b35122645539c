"""PostgreSQL access: the pool, the migrations and the migration runner."""
