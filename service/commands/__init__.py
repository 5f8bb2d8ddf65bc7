"""One module per ``rerank`` subcommand (see ``service.cli``)."""
