package dev.opscd.sample;

import static org.junit.Assert.assertEquals;

import org.junit.Test;

public class HelloTest {

    @Test
    public void greetsByName() {
        assertEquals("Hello, OpsCD!", Hello.greet("  OpsCD "));
    }

    @Test
    public void greetsTheWorldWithoutAName() {
        assertEquals("Hello, world!", Hello.greet(null));
        assertEquals("Hello, world!", Hello.greet(" "));
    }

    @Test
    public void messageIsTheOneThePipelineLooksFor() {
        assertEquals("Hello from OpsCD", Hello.MESSAGE);
    }
}
