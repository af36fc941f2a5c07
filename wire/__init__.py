"""The Flower records of :mod:`shared_model.messages`, for both sides."""
