"""Training, as a single process would do it: data, tasks, models, the state vector, the
round's arithmetic, the yardstick.  No NATS: nothing here knows it travels."""
