"""Generated attention modules (kernelsearch compile); do not edit."""
