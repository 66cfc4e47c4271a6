"""The one training engine shared by teacher training, transfer and probing."""
