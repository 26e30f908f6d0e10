"""What the tests share: clients of the gateway's transports and checks of what they send."""
