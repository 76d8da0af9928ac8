# ruff: noqa
# Generated from kms_v2.proto by kms_agent/proto/_generate.py. DO NOT EDIT.
from typing import Any

from kms_agent.proto import kms_v2_pb2

class KeyManagementServiceStub:
    def __init__(self, channel: Any) -> None: ...
    Status: Any
    Decrypt: Any
    Encrypt: Any

class KeyManagementServiceServicer:
    def Status(self, request: kms_v2_pb2.StatusRequest, context: Any) -> Any: ...
    def Decrypt(self, request: kms_v2_pb2.DecryptRequest, context: Any) -> Any: ...
    def Encrypt(self, request: kms_v2_pb2.EncryptRequest, context: Any) -> Any: ...

def add_KeyManagementServiceServicer_to_server(servicer: Any, server: Any) -> None: ...
