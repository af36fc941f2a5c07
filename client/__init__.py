"""Site side: data checks and loading, local training, the Flower ClientApp, the CLI."""
