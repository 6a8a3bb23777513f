"""twistd plugin: makes ``twistd tcptunnel --config settings.xml`` work.

Nothing is imported from tcptunnel until twistd actually picks this plugin.
"""

from twisted.application.service import ServiceMaker

tcptunnel = ServiceMaker(
    "tcptunnel",
    "tcptunnel.tap",
    "Reverse TCP tunnel: Gateway, Proxy-Server and Proxy-Client roles from settings.xml",
    "tcptunnel",
)
