"""cbam-viz: see what CBAM changes inside a ResNet."""
