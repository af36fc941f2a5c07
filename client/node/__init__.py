"""The site as a Flower node: one round at a site as plain functions, the ClientApp
over them, and app pinning's launcher."""
