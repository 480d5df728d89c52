"""ServerApp and ClientApp of the Flower SecAgg+ benchmark (see ``server_app``)."""
