"""Federation glue on Flower: the protocol, the server state, the ServerApp and ClientApp."""
