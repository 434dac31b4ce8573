"""Federation glue: the Flower ServerApp, ClientApp and the per-client strategy."""
