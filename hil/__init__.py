"""Bench rig: controller simulator, wire protocol and rig configurations (issue [4/7])."""
