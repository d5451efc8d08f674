def main() -> None:
    print("prolora-serve")
