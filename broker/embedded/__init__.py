"""The embedded MQTT broker (amqtt), its plugins, logins, certificates and the device ACL."""
