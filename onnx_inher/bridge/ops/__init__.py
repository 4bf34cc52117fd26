"""Op converters grouped by family, registered by (domain, op type, opset range)."""
