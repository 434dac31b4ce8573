"""Federation glue on Flower: the messages and their codec, the server state, the ServerApp and
ClientApp."""
