"""Small fakes shared by the pure unit tests."""


class FakeRpcError(Exception):
    """What a grpc call raises, as far as the client's error translation reads it."""

    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return ()
