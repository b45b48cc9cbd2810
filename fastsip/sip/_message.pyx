# placeholder: the message core is being written (issue 2); names exist so the package imports.
class CSeq: pass
class Headers: pass
class Limits: pass
class Message: pass
class NameAddr: pass
class Request(Message): pass
class Response(Message): pass
class URI: pass
class Via: pass
def message_length(buf): raise NotImplementedError
def parse(data): raise NotImplementedError
def parse_uri(text): raise NotImplementedError
