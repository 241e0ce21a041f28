"""Wire format and MQTT publishing."""
