package dev.opscd.sample;

/** The sample application OpsCD's tests build, package into an image and run. */
public final class Hello {

    static final String MESSAGE = "Hello from OpsCD";

    private Hello() {
    }

    /** Greets {@code name}; a blank or missing name greets the world. */
    public static String greet(String name) {
        String who = (name == null || name.isBlank()) ? "world" : name.strip();
        return "Hello, " + who + "!";
    }

    public static void main(String[] args) {
        System.out.println(MESSAGE);
    }
}
