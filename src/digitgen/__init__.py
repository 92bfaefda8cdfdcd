"""digitgen: conditional digit generation on MNIST."""
