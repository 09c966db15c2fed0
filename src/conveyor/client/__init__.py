"""Producers' clients (`Client`, `AsyncClient`) and the channel helpers workers share."""
